"""Serial bridge between a device agent and a microcontroller (protocol: `firmware_bridge/PROTOCOL.md`).

The pure core (`framing`, `messages`, `head_blob`) only turns bytes into values and back: no ports,
threads or files, so it runs in tests, fuzzers and the emulator alike. Transport lives elsewhere
(`link`, `emulator`). Nothing is imported here on purpose: `import firmware_bridge.framing` must not
drag pyserial in.
"""
