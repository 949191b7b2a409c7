"""How every program of the project answers bad input on its command line: one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line that ends with where the usage is, instead of the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} ({self.prog} --help shows the usage)\n")
