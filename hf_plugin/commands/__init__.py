"""The commands of `hf-plugin`, one module each (generate's related methods in `related`).

Every command module has `register(subparsers)`, which adds the command's parser and sets its `run` default to the
module's `run(args)` handler. A handler reads the parsed arguments and calls the library, and the small helpers
of `common`, with explicit keyword arguments; the argument groups several commands share are in `arguments`.
`hf_plugin.cli` builds the parser from `COMMANDS` and runs the handler. The library never imports this package.
"""

from . import cache, check_server, demo, evaluate, generate, init, push, serve, train, unlearn


# In the order `hf-plugin --help` lists them.
COMMANDS = (init, generate, train, cache, unlearn, evaluate, demo, check_server, push, serve)
