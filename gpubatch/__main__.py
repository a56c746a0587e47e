from gpubatch.cli.main import main

raise SystemExit(main())
