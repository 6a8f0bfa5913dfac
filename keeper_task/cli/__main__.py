import sys

from keeper_task.cli import main

sys.exit(main())
