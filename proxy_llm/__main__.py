import sys

from proxy_llm.cli import main

sys.exit(main())
