import sys

from openrlaif.cli import main

sys.exit(main())
