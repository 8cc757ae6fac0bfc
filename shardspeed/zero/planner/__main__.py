from shardspeed.zero.planner.cli import main

raise SystemExit(main())
