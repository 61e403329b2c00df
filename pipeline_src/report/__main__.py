import sys

from pipeline_src.report.build import main

sys.exit(main())
