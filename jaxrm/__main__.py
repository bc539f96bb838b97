import sys

from jaxrm.cli import main

sys.exit(main())
