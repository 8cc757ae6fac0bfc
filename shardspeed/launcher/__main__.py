from shardspeed.launcher.cli import main

raise SystemExit(main())
