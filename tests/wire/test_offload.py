"""The vnet word (``vhostnet.wire.offload``): the layout ext/vnet.pxd and the ring kernel use."""

from __future__ import annotations

import random

import pytest

from vhostnet.wire.offload import (
    DATA_VALID,
    GSO_TCPV4,
    NEEDS_CSUM,
    VnetFields,
    partial_l4_checksum,
    tcp_data_word,
    vnet_fields,
    vnet_word,
)


def test_fields_sit_where_the_c_layout_says() -> None:
    word = vnet_word(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16)
    assert word == NEEDS_CSUM | GSO_TCPV4 << 8 | 1448 << 16 | 34 << 32 | 16 << 48
    assert vnet_fields(word) == VnetFields(flags=NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=1448,
                                           csum_start=34, csum_offset=16)


def test_random_words_round_trip() -> None:
    rng = random.Random(3)
    for _ in range(200):
        fields = VnetFields(rng.randrange(256), rng.randrange(256), rng.randrange(1 << 16),
                            rng.randrange(1 << 16), rng.randrange(1 << 16))
        assert vnet_fields(vnet_word(*fields)) == fields


@pytest.mark.parametrize("fields", [(256, 0, 0, 0, 0), (0, 256, 0, 0, 0), (0, 0, 1 << 16, 0, 0),
                                    (0, 0, 0, 1 << 16, 0), (0, 0, 0, 0, 1 << 16), (-1, 0, 0, 0, 0)])
def test_a_field_too_wide_is_refused(fields: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        vnet_word(*fields)


def test_partial_l4_checksum_only_at_the_given_field() -> None:
    assert partial_l4_checksum(vnet_word(NEEDS_CSUM, 0, 0, 34, 16), 34, 16)
    assert not partial_l4_checksum(vnet_word(NEEDS_CSUM, 0, 0, 34, 6), 34, 16)
    assert not partial_l4_checksum(vnet_word(NEEDS_CSUM, 0, 0, 38, 16), 34, 16)
    assert not partial_l4_checksum(vnet_word(DATA_VALID, 0, 0, 34, 16), 34, 16)


def test_tcp_data_word_asks_for_segmentation_only_beyond_the_mss() -> None:
    assert vnet_fields(tcp_data_word(1460, 1460)) == (NEEDS_CSUM, 0, 0, 34, 16)
    assert vnet_fields(tcp_data_word(1461, 1460)) == (NEEDS_CSUM, GSO_TCPV4, 1460, 34, 16)
