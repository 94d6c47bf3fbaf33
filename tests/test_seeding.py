"""One seed derivation: its values are pinned, since the embedded data's bytes and every
run's replay depend on them."""

from lssfl.common.seeding import derive_seed, seed_of


def test_seed_values_are_pinned():
    assert derive_seed(0, 0, "head") == 3958131934430441495
    assert derive_seed(3, 2, "silo-1") == 8363894177387720091
    assert seed_of("noise", 0) == 5475652017585367974
    assert seed_of(0, "silo-1") == 9094842641223703707
    assert seed_of(0, "test", "noisy") == 5364682885505613390


def test_a_round_seed_is_the_hash_of_its_named_parts():
    assert derive_seed(7, 4, "silo-2") == seed_of("lssfl", 7, 4, "silo-2")
    assert 0 <= seed_of("x") < 2**63
