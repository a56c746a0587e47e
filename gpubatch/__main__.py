from gpubatch.cli import main

raise SystemExit(main())
