import sys

from genfuse.cli import main

sys.exit(main())
