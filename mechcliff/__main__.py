import sys

from mechcliff.cli import main

sys.exit(main())
