import sys

from whatsappd.cli import main

sys.exit(main())
