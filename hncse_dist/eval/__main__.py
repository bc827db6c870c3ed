import sys

from .run import eval_main

sys.exit(eval_main(sys.argv[1:]))
