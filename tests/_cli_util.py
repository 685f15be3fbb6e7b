"""The CliRunner every CLI test uses: stdout and stderr kept apart on every click version."""
from click.testing import CliRunner


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always separates stderr
        return CliRunner()
