from load_tests.cli import main

raise SystemExit(main())
