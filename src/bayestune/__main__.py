import sys

from bayestune.cli import main

sys.exit(main())
