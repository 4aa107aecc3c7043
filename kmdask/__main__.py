from kmdask.cli import main

raise SystemExit(main())
