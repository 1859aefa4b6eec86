"""The ``prismrec`` command line: one module per command group, assembled in :mod:`prismrec.cli.app`.

``data`` (datasets), ``semantics`` (``derive`` and ``semantics status|show``), ``train`` (``train``,
``evaluate``), ``report`` (``compare``), ``experiments`` (``reproduce``), ``serving`` (``export``,
``serve``, ``recommend``), ``llmrec`` (``mllm-msr``, ``speeder``), and ``common`` (what they share). Each is
a thin layer over the library package of the same stage. This package imports nothing itself: importing
one command module does not build the whole application.
"""
