import sys

from thermodiff.cli import main

sys.exit(main())
