from distilflow.cli import main

raise SystemExit(main())
