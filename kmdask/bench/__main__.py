from kmdask.bench import main

raise SystemExit(main())
