"""`ray job submit ... -- python jobs/deploy.py SPEC.yaml`: see latentforge.jobs and jobs/specs/."""

import sys

from latentforge.jobs import main

if __name__ == "__main__":
    sys.exit(main("deploy"))
