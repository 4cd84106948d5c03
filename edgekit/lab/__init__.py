"""Stand-in devices: real sshd in network namespaces on this machine (local.py) and an emulated
arm64 Raspberry-Pi-OS-like root under qemu (emulated.py), with their ssh keys (keys.py).

Used by convert (the compatibility check under emulation), deploy's tests, the benchmarks and the
main job; `convert` and `deploy` both may import it, never each other. Nothing in
`edgekit.runtime` imports it (a device never needs it).
"""
