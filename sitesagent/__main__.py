from sitesagent.cli import main

raise SystemExit(main())
