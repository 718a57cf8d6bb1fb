import sys

from upparat.operator.cli import main

sys.exit(main())
