from poweremail.cli import main

raise SystemExit(main())
