"""The MyNAS backup engine: plain asyncio and threads, usable without Home Assistant.

Nothing under this package may import ``homeassistant`` (a test enforces it): the same code
runs inside Home Assistant, on the command line, in the benchmark and in the demo.
"""
