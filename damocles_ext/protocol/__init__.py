"""Sans-IO codecs for the two wire protocols: dext/1 frames and damocles' JSON lines.

Nothing in this package does I/O: decoders are fed bytes and hand back messages; encoders return
bytes. The supervisor, the child runtime and the client do the reading and writing.
"""
