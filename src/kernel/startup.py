# Run silently in every kernel before the user's first line.
def __mcp_interpreter_setup():
    import warnings

    # plotly 6 warns on every export that kaleido 0.2 is deprecated; the
    # project pins kaleido 0.2.1 on purpose because it ships its own Chromium.
    warnings.filterwarnings("ignore", message=r"(?s).*Kaleido versions less than 1")


__mcp_interpreter_setup()
del __mcp_interpreter_setup
