from halluc_rl.cli import main

raise SystemExit(main())
