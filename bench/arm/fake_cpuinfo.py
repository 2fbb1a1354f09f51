"""A Cortex-A76's /proc/cpuinfo (the Raspberry Pi 5's core), one entry per host core, for the emulated root.

ONNX Runtime's cpuinfo reads /proc/cpuinfo; under QEMU user mode it is the host's (x86), which it cannot parse.
The features are those QEMU's cortex-a76 model reports in AT_HWCAP (armv8.2-a with dotprod, no SVE, no i8mm).
"""

import os

FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"
for i in range(os.cpu_count() or 1):
    print(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {FEATURES}\nCPU implementer\t: 0x41\n"
          f"CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n")
