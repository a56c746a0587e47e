"""Running a job: the runner, cluster profiles and executors, progress."""
