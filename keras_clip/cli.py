"""What the package's command-line modules share."""
from absl import app, flags


def run(main, own_flags):
    """`app.run(main)` for a module whose flags live in its own `flags.FlagValues`
    (`own_flags`), so that modules defining flags of the same names (`preset`, ...)
    can be imported together: the module's flags are parsed first, absl's own
    (logging) and unknown ones then by the global set."""
    app.run(main, flags_parser=lambda argv: flags.FLAGS(own_flags(argv, known_only=True)))
