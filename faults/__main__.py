import sys

from faults.suite import main

sys.exit(main())
