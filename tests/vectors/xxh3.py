"""XXH3 golden vectors, seed 0, from upstream xxHash's sanity checks.

The input is upstream's sanity buffer (``fillTestBuffer``: a byte generator seeded with
PRIME32_1 and multiplied by PRIME64_1, top byte each step). The lengths walk every XXH3
length branch: 0, 1-3, 4-8, 9-16, 17-128, 129-240 and the long-input loop (> 240, across
stripe and block boundaries). Each value was cross-checked against the PyPI ``xxhash``
build when it was added.
"""

PRIME32_1 = 2654435761
PRIME64_1 = 11400714785074694797


def sanity_buffer(length: int) -> bytes:
    out = bytearray(length)
    gen = PRIME32_1
    for i in range(length):
        out[i] = gen >> 56
        gen = (gen * PRIME64_1) & 0xFFFFFFFFFFFFFFFF
    return bytes(out)


XXH3_64 = {
    0: 0x2D06800538D394C2,
    1: 0xC44BDFF4074EECDB,
    6: 0x27B56A84CD2D7325,
    12: 0xA713DAF0DFBB77E7,
    24: 0xA3FE70BF9D3510EB,
    48: 0x397DA259ECBA1F11,
    80: 0xBCDEFBBB2C47C90A,
    195: 0xCD94217EE362EC3A,
    403: 0xCDEB804D65C6DEA4,
    512: 0x617E49599013CB6B,
    2048: 0xDD59E2C3A5F038E0,
    2240: 0x6E73A90539CF2948,
    2367: 0xCB37AEB9E5D361ED,
}

# (low64, high64) as upstream lists them; the Python integer is high << 64 | low.
XXH3_128 = {
    0: (0x6001C324468D497F, 0x99AA06D3014798D8),
    1: (0xC44BDFF4074EECDB, 0xA6CD5E9392000F6A),
    6: (0x3E7039BDDA43CFC6, 0x082AFE0B8162D12A),
    12: (0x061A192713F69AD9, 0x6E3EFD8FC7802B18),
    24: (0x1E7044D28B1B901D, 0x0CE966E4678D3761),
    48: (0xF942219AED80F67B, 0xA002AC4E5478227E),
    81: (0x5E8BAFB9F95FB803, 0x4952F58181AB0042),
    222: (0xF1AEBD597CEC6B3A, 0x337E09641B948717),
    403: (0xCDEB804D65C6DEA4, 0x1B6DE21E332DD73D),
    512: (0x617E49599013CB6B, 0x18D2D110DCC9BCA1),
    2048: (0xDD59E2C3A5F038E0, 0xF736557FD47073A5),
    2240: (0x6E73A90539CF2948, 0xCCB134FBFA7CE49D),
}
