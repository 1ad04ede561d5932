"""Hardware-in-the-loop tests of the serial link: emulated MCU by default, a real board with --hil-port."""
