import sys

from borgdqn.cli import main

sys.exit(main())
