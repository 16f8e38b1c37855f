import sys

from facegen.jobs.cli import main

sys.exit(main())
