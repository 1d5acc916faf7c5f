"""Standard inference protocols as pure code: request parsing, tensor codecs and response encoding,
with no I/O (the gateway's fronts and the replica's protocol handlers do that).

It may import only `cirrus.types`, `cirrus.spec`, `cirrus.predictor` and itself; heavy libraries
(numpy) are imported inside the functions that need them, so `import cirrus` stays light.
"""
