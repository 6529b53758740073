import sys

from quantflow.cli import main

sys.exit(main())
