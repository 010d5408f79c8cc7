"""Known-answer and property tests of the protocol core's primitives.

HKDF (RFC 5869), AES-256-GCM (McGrew-Viega GCM spec test case 16), the AES-256-CTR PRG,
X25519 (RFC 7748), Ed25519 (RFC 8032), Shamir sharing, neighbour graphs and thresholds.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from secagg.protocol import aead, graph, keys, prg, shamir, signatures, thresholds
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.messages import GroupConfig, Mode

H = bytes.fromhex


def counter_rng(seed: int):
    """A deterministic randbytes for tests (not the code under test's own generator)."""
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


# ============================================================================ HKDF (RFC 5869)

RFC5869_SHA256 = [
    pytest.param(  # A.1 Test Case 1: basic test case with SHA-256
        H("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b"),
        H("000102030405060708090a0b0c"),
        H("f0f1f2f3f4f5f6f7f8f9"),
        42,
        H("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
        id="rfc5869-case1",
    ),
    pytest.param(  # A.2 Test Case 2: longer inputs and outputs
        bytes(range(0x50)),
        bytes(range(0x60, 0xB0)),
        bytes(range(0xB0, 0x100)),
        82,
        H(
            "b11e398dc80327a1c8e7f78c596a4934"
            "4f012eda2d4efad8a050cc4c19afa97c"
            "59045a99cac7827271cb41c65e590e09"
            "da3275600c2f09b8367793a9aca3db71"
            "cc30c58179ec3e87c14c01d5c1f3434f"
            "1d87"
        ),
        id="rfc5869-case2",
    ),
    pytest.param(  # A.3 Test Case 3: zero-length salt and info
        H("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b"),
        b"",
        b"",
        42,
        H("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
        id="rfc5869-case3",
    ),
]


@pytest.mark.parametrize("ikm, salt, info, length, okm", RFC5869_SHA256)
def test_hkdf_sha256_rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int, okm: bytes) -> None:
    assert len(ikm) in (22, 80)
    assert keys.hkdf_sha256(ikm, salt=salt, info=info, length=length) == okm


def test_hkdf_default_length_is_32_and_prefix_of_longer_output() -> None:
    ikm, salt, info = os.urandom(32), os.urandom(16), b"x"
    short = keys.hkdf_sha256(ikm, salt=salt, info=info)
    assert len(short) == keys.KEY_BYTES == 32
    assert keys.hkdf_sha256(ikm, salt=salt, info=info, length=64)[:32] == short


def test_derive_binds_session_purpose_and_index_order() -> None:
    shared = os.urandom(32)
    s1, s2 = os.urandom(32), os.urandom(32)
    base = keys.derive(shared, session=s1, purpose=keys.Purpose.MASK_SEED, first=1, second=2)
    assert len(base) == 32
    assert base == keys.derive(shared, session=s1, purpose=keys.Purpose.MASK_SEED, first=1, second=2)
    others = {
        keys.derive(shared, session=s2, purpose=keys.Purpose.MASK_SEED, first=1, second=2),
        keys.derive(shared, session=s1, purpose=keys.Purpose.SHARE_ENCRYPTION, first=1, second=2),
        keys.derive(shared, session=s1, purpose=keys.Purpose.SELF_MASK, first=1, second=2),
        keys.derive(shared, session=s1, purpose=keys.Purpose.ROUNDING, first=1, second=2),
        keys.derive(shared, session=s1, purpose=keys.Purpose.MASK_SEED, first=2, second=1),
        keys.derive(shared, session=s1, purpose=keys.Purpose.MASK_SEED, first=1, second=3),
    }
    assert base not in others and len(others) == 6


# ============================================================================ AES-256-GCM

# McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", Appendix B, Test Case 16.
TC16_K = H("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
TC16_P = H(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
TC16_A = H("feedfacedeadbeeffeedfacedeadbeefabaddad2")
TC16_IV = H("cafebabefacedbaddecaf888")
TC16_C = H(
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
)
TC16_T = H("76fc6ece0f4e1768cddf8853bb2d551b")


def test_aesgcm_reproduces_gcm_spec_test_case_16() -> None:
    assert (len(TC16_K), len(TC16_P), len(TC16_A), len(TC16_IV)) == (32, 60, 20, 12)
    assert AESGCM(TC16_K).encrypt(TC16_IV, TC16_P, TC16_A) == TC16_C + TC16_T
    assert AESGCM(TC16_K).decrypt(TC16_IV, TC16_C + TC16_T, TC16_A) == TC16_P


def test_associated_data_layout() -> None:
    session = bytes(range(32))
    ad = aead.associated_data(session, 2, 515)
    assert ad == b"secagg/v1|share|" + session + b"|\x00\x00\x00\x02|\x00\x00\x02\x03"


def test_seal_is_nonce_then_aesgcm_with_bound_associated_data() -> None:
    session = os.urandom(32)
    ct = aead.seal(TC16_K, TC16_P, session=session, sender=3, receiver=7, nonce=TC16_IV)
    assert ct == TC16_IV + AESGCM(TC16_K).encrypt(TC16_IV, TC16_P, aead.associated_data(session, 3, 7))
    # GCM's ciphertext body does not depend on the AAD: it is the spec's C; only the tag differs.
    assert ct[: aead.NONCE_BYTES] == TC16_IV
    assert ct[aead.NONCE_BYTES : -16] == TC16_C
    assert ct[-16:] != TC16_T
    assert aead.open_(TC16_K, ct, session=session, sender=3, receiver=7) == TC16_P


def test_seal_rejects_bad_nonce_length() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        aead.seal(os.urandom(32), b"x", session=b"s", sender=1, receiver=2, nonce=bytes(8))


def _expect_rejected(key: bytes, ct: bytes, *, session: bytes, sender: int, receiver: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        aead.open_(key, ct, session=session, sender=sender, receiver=receiver)
    assert info.value.index == sender
    assert f"client {sender}" in str(info.value)


def test_open_rejects_every_tampered_byte() -> None:
    key, session = os.urandom(32), os.urandom(32)
    pt = os.urandom(2 * shamir.SHARE_BYTES)
    ct = aead.seal(key, pt, session=session, sender=2, receiver=5, nonce=os.urandom(12))
    for pos in range(len(ct)):
        bad = bytearray(ct)
        bad[pos] ^= 0x01
        _expect_rejected(key, bytes(bad), session=session, sender=2, receiver=5)
    _expect_rejected(key, ct[:-1], session=session, sender=2, receiver=5)        # truncated tag
    _expect_rejected(key, ct + b"\x00", session=session, sender=2, receiver=5)   # extended
    _expect_rejected(key, ct[:27], session=session, sender=2, receiver=5)        # too short
    assert aead.open_(key, ct, session=session, sender=2, receiver=5) == pt


def test_open_rejects_replay_into_another_round_and_rerouting() -> None:
    key, session = os.urandom(32), os.urandom(32)
    ct = aead.seal(key, b"share", session=session, sender=2, receiver=3, nonce=os.urandom(12))
    _expect_rejected(key, ct, session=os.urandom(32), sender=2, receiver=3)   # replay into another round
    _expect_rejected(key, ct, session=session, sender=2, receiver=4)          # re-routed to client 4
    _expect_rejected(key, ct, session=session, sender=4, receiver=3)          # claimed another sender
    _expect_rejected(key, ct, session=session, sender=3, receiver=2)          # reflected back
    _expect_rejected(os.urandom(32), ct, session=session, sender=2, receiver=3)  # wrong key


# ============================================================================ PRG


def reference_keystream(seed: bytes, nbytes: int) -> bytes:
    """AES-256-CTR with a zero initial counter block, computed block by block with ECB."""
    enc = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    blocks = (nbytes + 15) // 16
    counters = b"".join(i.to_bytes(16, "big") for i in range(blocks))
    return (enc.update(counters) + enc.finalize())[:nbytes]


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 17, 1000])
@pytest.mark.parametrize("dtype, fmt", [(np.uint32, "<u4"), (np.uint64, "<u8")])
def test_expand_is_raw_aes256_ctr_keystream_little_endian(n: int, dtype: type, fmt: str) -> None:
    seed = os.urandom(32)
    width = np.dtype(dtype).itemsize
    ctr = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(n * width))
    assert ctr == reference_keystream(seed, n * width)
    expected = np.frombuffer(ctr, dtype=fmt).astype(dtype)
    out = prg.expand(seed, n, dtype)
    assert out.dtype == np.dtype(dtype) and out.shape == (n,)
    assert np.array_equal(out, expected)
    assert prg.keystream(seed, n * width) == ctr


def test_expand_known_answer_first_word() -> None:
    # AES-256 of the all-zero block under the all-zero key (FIPS-197 style KAT):
    # dc95c078a2408989ad48a21492842087, read little-endian.
    ks = prg.keystream(bytes(32), 16)
    assert ks == H("dc95c078a2408989ad48a21492842087")
    assert int(prg.expand(bytes(32), 1, np.uint32)[0]) == int.from_bytes(H("dc95c078"), "little")
    assert int(prg.expand(bytes(32), 1, np.uint64)[0]) == int.from_bytes(H("dc95c078a2408989"), "little")


def _mod_sum(acc: np.ndarray, stream: np.ndarray, sign: int, bits: int) -> np.ndarray:
    a = acc.astype(object)
    b = stream.astype(object)
    return np.array([(int(x) + sign * int(y)) % (1 << bits) for x, y in zip(a, b, strict=True)], dtype=acc.dtype)


@pytest.mark.parametrize("dtype, bits", [(np.uint32, 32), (np.uint64, 64)])
@pytest.mark.parametrize("subtract", [False, True])
def test_accumulate_is_modular_add_or_subtract_of_expand(dtype: type, bits: int, subtract: bool) -> None:
    rng = np.random.default_rng(7)
    # Sizes go up, down and up again so the per-thread scratch buffer is reused and regrown.
    for n in (5, 1000, 3, 1, 4097, 16, 0, 31):
        seed = os.urandom(32)
        acc = rng.integers(0, np.iinfo(dtype).max, size=n, dtype=dtype, endpoint=True)
        expected = _mod_sum(acc, prg.expand(seed, n, dtype), -1 if subtract else 1, bits)
        prg.accumulate(acc, seed, subtract=subtract)
        assert acc.dtype == np.dtype(dtype)
        assert np.array_equal(acc, expected), n


def test_accumulate_add_then_subtract_cancels() -> None:
    acc = np.arange(100, dtype=np.uint64)
    seeds = [os.urandom(32) for _ in range(4)]
    for s in seeds:
        prg.accumulate(acc, s)
    for s in reversed(seeds):
        prg.accumulate(acc, s, subtract=True)
    assert np.array_equal(acc, np.arange(100, dtype=np.uint64))


def test_prg_rejects_bad_seed_and_dtype() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        prg.expand(bytes(16), 4)
    with pytest.raises(ValueError, match="uint32 or uint64"):
        prg.expand(bytes(32), 4, np.int32)
    with pytest.raises(ValueError, match="uint32 or uint64"):
        prg.accumulate(np.zeros(4, dtype=np.uint16), bytes(32))
    with pytest.raises(ValueError):
        prg.keystream(bytes(32), -1)


def test_different_seeds_give_different_streams() -> None:
    a, b = os.urandom(32), os.urandom(32)
    assert not np.array_equal(prg.expand(a, 64), prg.expand(b, 64))
    assert np.array_equal(prg.expand(a, 64), prg.expand(a, 64))
    # seeds differing in one bit only
    c = bytes([a[0] ^ 1]) + a[1:]
    assert np.count_nonzero(prg.expand(a, 64) == prg.expand(c, 64)) < 4


def test_uniform_in_unit_interval() -> None:
    u = prg.uniform(os.urandom(32), 100_000)
    assert u.dtype == np.float64 and u.shape == (100_000,)
    assert np.all(u >= 0.0) and np.all(u < 1.0)
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.005
    # the largest possible output stays below 1
    assert prg.uniform(bytes(32), 0).size == 0


def test_uniform_maps_top_53_bits() -> None:
    seed = os.urandom(32)
    raw = prg.expand(seed, 10, np.uint64)
    expected = [(int(w) >> 11) / 2.0**53 for w in raw]
    assert prg.uniform(seed, 10).tolist() == expected


# ============================================================================ X25519

RFC7748_ALICE_PRIV = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_ALICE_PUB = H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
RFC7748_BOB_PRIV = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
RFC7748_BOB_PUB = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
RFC7748_SHARED = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_section_6_1() -> None:
    assert keys.generate_keypair(RFC7748_ALICE_PRIV).public == RFC7748_ALICE_PUB
    assert keys.KeyPair.from_private(RFC7748_BOB_PRIV).public == RFC7748_BOB_PUB
    assert keys.agree(RFC7748_ALICE_PRIV, RFC7748_BOB_PUB) == RFC7748_SHARED
    assert keys.agree(RFC7748_BOB_PRIV, RFC7748_ALICE_PUB) == RFC7748_SHARED


def test_pair_keys_through_rfc7748_vector_is_hkdf_of_shared_secret() -> None:
    session = os.urandom(32)
    k = keys.pair_keys(RFC7748_ALICE_PRIV, {9: RFC7748_BOB_PUB}, session=session, purpose=keys.Purpose.MASK_SEED, u=4)[9]
    info = b"secagg/v1|pairwise-mask-seed|\x00\x00\x00\x04|\x00\x00\x00\x09"
    assert k == keys.hkdf_sha256(RFC7748_SHARED, salt=session, info=info)


def test_agree_rejects_bad_and_small_order_public_keys() -> None:
    with pytest.raises(ValueError, match="invalid X25519 public key"):
        keys.agree(os.urandom(32), bytes(31))
    with pytest.raises(ValueError):
        keys.agree(os.urandom(32), bytes(32))  # small-order point: all-zero shared secret
    with pytest.raises(ValueError, match="32 bytes"):
        keys.generate_keypair(bytes(31))
    with pytest.raises(ValueError, match="client 3"):
        keys.pair_keys(os.urandom(32), {3: bytes(5)}, session=b"s", purpose=keys.Purpose.MASK_SEED, u=1)


def test_pair_keys_symmetric_and_separated() -> None:
    session, other_session = os.urandom(32), os.urandom(32)
    kp = {i: keys.generate_keypair(os.urandom(32)) for i in range(1, 6)}
    pubs = {i: k.public for i, k in kp.items()}
    table = {
        (purpose, sess): {
            u: keys.pair_keys(kp[u].private, {v: pubs[v] for v in kp if v != u}, session=sess, purpose=purpose, u=u)
            for u in kp
        }
        for purpose in (keys.Purpose.MASK_SEED, keys.Purpose.SHARE_ENCRYPTION)
        for sess in (session, other_session)
    }
    for per_u in table.values():
        for u, v in itertools.permutations(kp, 2):
            assert per_u[u][v] == per_u[v][u]             # u->v equals v->u
            assert len(per_u[u][v]) == 32
    mask = table[(keys.Purpose.MASK_SEED, session)]
    enc = table[(keys.Purpose.SHARE_ENCRYPTION, session)]
    mask2 = table[(keys.Purpose.MASK_SEED, other_session)]
    all_keys = []
    for u, v in itertools.combinations(kp, 2):
        assert mask[u][v] != enc[u][v]                    # purpose separation
        assert mask[u][v] != mask2[u][v]                  # session separation
        all_keys += [mask[u][v], enc[u][v], mask2[u][v]]
    assert len(set(all_keys)) == len(all_keys)            # every pair, purpose, session distinct


# ============================================================================ Ed25519

RFC8032_T1_SK = H("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_T1_PK = H("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_T1_SIG = H(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_ed25519_rfc8032_test_1() -> None:
    assert signatures.public_key(RFC8032_T1_SK) == RFC8032_T1_PK
    assert signatures.sign(RFC8032_T1_SK, b"") == RFC8032_T1_SIG
    signatures.verify(RFC8032_T1_PK, RFC8032_T1_SIG, b"", index=1)


def test_ed25519_round_trip_and_rejections() -> None:
    sk = os.urandom(32)
    pk = signatures.public_key(sk)
    msg = signatures.keys_message(b"s" * 32, 3, os.urandom(32), os.urandom(32))
    sig = signatures.sign(sk, msg)
    signatures.verify(pk, sig, msg, index=3)  # no exception

    def rejected(public: bytes, signature: bytes, message: bytes) -> RemoteProtocolError:
        with pytest.raises(RemoteProtocolError) as info:
            signatures.verify(public, signature, message, index=3)
        assert info.value.reason is DropReason.BAD_SIGNATURE
        assert info.value.index == 3
        return info.value

    bad = bytearray(sig)
    bad[10] ^= 0x40
    assert "client 3" in str(rejected(pk, bytes(bad), msg))
    rejected(pk, sig, msg + b"x")                                  # other message
    rejected(signatures.public_key(os.urandom(32)), sig, msg)      # other key
    rejected(pk[:31], sig, msg)                                    # malformed key
    rejected(pk, sig[:63], msg)                                    # malformed signature


def test_signed_messages_bind_session_index_and_keys() -> None:
    """Every signed message is bound to the config digest (was: the session), the signer's seat and
    its round keys; the consistency message also to the survivor set and the U1 set it was shown."""
    s, c_pub, s_pub = os.urandom(32), os.urandom(32), os.urandom(32)
    base = signatures.keys_message(s, 1, c_pub, s_pub)
    assert base != signatures.keys_message(os.urandom(32), 1, c_pub, s_pub)
    assert base != signatures.keys_message(s, 2, c_pub, s_pub)
    assert base != signatures.keys_message(s, 1, s_pub, c_pub)
    u1 = frozenset({1, 2, 3, 4})
    c1 = signatures.consistency_message(s, 1, c_pub, s_pub, frozenset({3, 1, 2}), u1)
    assert c1 == signatures.consistency_message(s, 1, c_pub, s_pub, (1, 2, 3), (4, 3, 2, 1))   # order does not matter
    assert c1 != signatures.consistency_message(s, 1, c_pub, s_pub, frozenset({1, 2}), u1)
    assert c1 != signatures.consistency_message(os.urandom(32), 1, c_pub, s_pub, frozenset({1, 2, 3}), u1)
    assert c1 != signatures.consistency_message(s, 2, c_pub, s_pub, frozenset({1, 2, 3}), u1)           # signer's seat
    assert c1 != signatures.consistency_message(s, 1, s_pub, c_pub, frozenset({1, 2, 3}), u1)           # signer's keys
    assert c1 != signatures.consistency_message(s, 1, c_pub, os.urandom(32), frozenset({1, 2, 3}), u1)
    assert c1 != signatures.consistency_message(s, 1, c_pub, s_pub, frozenset({1, 2, 3}), u1 - {4})     # the U1 it saw
    # the boundary between U3 and U1 is not ambiguous
    assert (signatures.consistency_message(s, 1, c_pub, s_pub, (1, 2), (3,))
            != signatures.consistency_message(s, 1, c_pub, s_pub, (1,), (2, 3)))
    assert c1 != base
    b = signatures.self_mask_commitment(s, 1, bytes(32))
    assert len(b) == 32 and b == signatures.self_mask_commitment(s, 1, bytes(32))
    assert b != signatures.self_mask_commitment(os.urandom(32), 1, bytes(32))
    assert b != signatures.self_mask_commitment(s, 2, bytes(32))
    assert b != signatures.self_mask_commitment(s, 1, bytes(31) + b"\x01")


# ============================================================================ Shamir


@pytest.mark.parametrize("t, n", [(3, 5), (2, 4), (1, 3), (4, 4)])
def test_shamir_every_t_subset_reconstructs(t: int, n: int) -> None:
    rb = counter_rng(t * 100 + n)
    secrets = [rb(32) for _ in range(3)] + [bytes(32), b"\xff" * 32]
    xs = list(range(1, n + 1))
    table = shamir.split(secrets, t, xs, rb)
    assert sorted(table) == xs and all(len(row) == len(secrets) for row in table.values())
    for k in range(t, n + 1):
        for subset in itertools.combinations(xs, k):
            for j, secret in enumerate(secrets):
                shares = [table[x][j] for x in subset]
                assert shamir.reconstruct(shares, t) == secret
                assert shamir.reconstruct(list(reversed(shares)), t) == secret


@pytest.mark.parametrize("t, n", [(3, 5), (2, 4)])
def test_shamir_fewer_than_t_shares_do_not_give_the_secret(t: int, n: int) -> None:
    rb = counter_rng(99)
    secret = rb(32)
    table = shamir.split([secret], t, list(range(1, n + 1)), rb)
    for subset in itertools.combinations(range(1, n + 1), t - 1):
        shares = [table[x][0] for x in subset]
        with pytest.raises(ValueError, match=f"need {t} shares"):
            shamir.reconstruct(shares, t)
        # Interpolating t-1 points as if they were enough gives garbage (or fails the 32-byte check).
        coeffs = shamir.lagrange_at_zero(list(subset))
        try:
            wrong = shamir.combine(coeffs, {s.x: s.y for s in shares})
        except ValueError:
            continue
        assert wrong != secret


def test_shamir_t_minus_one_shares_are_consistent_with_any_secret() -> None:
    """Perfect secrecy, concretely: any t-1 shares fit a polynomial with any chosen constant term."""
    t, xs = 3, [1, 2, 3, 4, 5]
    table = shamir.split([os.urandom(32)], t, xs, os.urandom)
    known = {x: table[x][0].y for x in (2, 5)}
    for candidate in (bytes(32), os.urandom(32)):
        c0 = int.from_bytes(candidate, "big")
        # the unique polynomial of degree < t through (0, c0) and the two known shares
        pts = {0: c0, **known}
        coeffs = {}
        for i in pts:
            num, den = 1, 1
            for j in pts:
                if j != i:
                    num = num * (3 - j) % shamir.PRIME
                    den = den * (i - j) % shamir.PRIME
            coeffs[i] = num * pow(den, -1, shamir.PRIME) % shamir.PRIME
        y3 = sum(coeffs[i] * pts[i] for i in pts) % shamir.PRIME
        subset = [shamir.Share(2, known[2]), shamir.Share(5, known[5]), shamir.Share(3, y3)]
        assert shamir.reconstruct(subset, t) == candidate


def test_lagrange_batched_equals_per_secret_reconstruct() -> None:
    rb = counter_rng(5)
    secrets = [rb(32) for _ in range(6)]
    xs = [2, 3, 5, 7, 8, 11]
    t = 4
    table = shamir.split(secrets, t, xs, rb)
    for responders in ([2, 5, 7, 11], [3, 5, 8, 11], [2, 3, 5, 7, 8]):
        coeffs = shamir.lagrange_at_zero(responders)
        for j, secret in enumerate(secrets):
            ys = {x: table[x][j].y for x in responders}
            batched = shamir.combine(coeffs, ys)
            single = shamir.reconstruct([table[x][j] for x in responders], t)
            assert batched == single == secret


def test_lagrange_coefficients_sum_to_one() -> None:
    # f = 1 (constant) must interpolate to 1 at zero.
    coeffs = shamir.lagrange_at_zero([1, 4, 9, 10])
    assert sum(coeffs.values()) % shamir.PRIME == 1
    with pytest.raises(ValueError, match="duplicate"):
        shamir.lagrange_at_zero([1, 2, 2])


def test_random_field_element_in_range_and_rejection_sampling() -> None:
    for _ in range(200):
        v = shamir.random_field_element(os.urandom)
        assert 0 <= v < shamir.PRIME
    # all-ones bytes give 2^521 - 1 == PRIME after masking: must be rejected, not reduced to 0.
    feed = iter([b"\xff" * shamir.SHARE_BYTES, b"\xff" * shamir.SHARE_BYTES, bytes(65) + b"\x07"])
    assert shamir.random_field_element(lambda n: next(feed)) == 7
    # the top 7 bits beyond 521 are masked off
    top = b"\xfe" + b"\x00" * 64 + b"\x05"
    assert shamir.random_field_element(lambda n: top) == 5


def test_share_bytes_round_trip_and_validation() -> None:
    table = shamir.split([os.urandom(32)], 2, [1, 2, 3], os.urandom)
    for x, (share,) in table.items():
        data = share.to_bytes()
        assert len(data) == shamir.SHARE_BYTES == 66
        assert shamir.share_from_bytes(x, data) == share
    edge = shamir.Share(4, shamir.PRIME - 1)
    assert shamir.share_from_bytes(4, edge.to_bytes()) == edge
    with pytest.raises(ValueError, match="66 bytes"):
        shamir.share_from_bytes(1, bytes(65))
    with pytest.raises(ValueError, match="field element"):
        shamir.share_from_bytes(1, shamir.PRIME.to_bytes(66, "big"))


def test_shamir_split_rejects_bad_parameters() -> None:
    s = [os.urandom(32)]
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(s, 0, [1, 2, 3], os.urandom)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(s, 4, [1, 2, 3], os.urandom)
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(s, 2, [1, 2, 2], os.urandom)
    with pytest.raises(ValueError, match="non-zero"):
        shamir.split(s, 2, [0, 1, 2], os.urandom)
    with pytest.raises(ValueError, match="32 bytes"):
        shamir.split([os.urandom(31)], 2, [1, 2, 3], os.urandom)


def test_shamir_inconsistent_shares_detected_by_size_check() -> None:
    table = shamir.split([os.urandom(32)], 3, [1, 2, 3], os.urandom)
    offset = int.from_bytes(os.urandom(64), "big") | 1 << 400
    shares = [table[1][0], table[2][0], shamir.Share(3, (table[3][0].y + offset) % shamir.PRIME)]
    # a share corrupted by a large offset moves f(0) (here by exactly the offset, l_3 = 1) to a
    # value far above 2^256: not a 32-byte secret
    with pytest.raises(ValueError, match="inconsistent"):
        shamir.reconstruct(shares, 3)


# ============================================================================ graphs


def _config(m: int, k: int | None, tag: bytes = b"") -> tuple[GroupConfig, dict[int, bytes]]:
    """A config with fresh commitments and the contributions that open them."""
    contributions = {i: os.urandom(32) for i in range(1, m + 1)}
    commitments = tuple(graph.commit_contribution(contributions[i]) for i in range(1, m + 1))
    cfg = GroupConfig(session=b"s" * 16 + tag, members=m, threshold=1, dim=1, neighbors=k, commitments=commitments)
    return cfg, contributions


def _ring(m: int) -> list[int]:
    return [int(u) for u in np.random.default_rng(int.from_bytes(os.urandom(4), "big")).permutation(m) + 1]


def test_complete_graph() -> None:
    g = graph.complete(5)
    assert sorted(g) == [1, 2, 3, 4, 5]
    for u, nb in g.items():
        assert nb == frozenset(range(1, 6)) - {u}
    cfg, contributions = _config(5, None)
    assert not cfg.sparse and cfg.degree == 4
    assert graph.for_group(cfg) == graph.for_group(cfg, contributions) == g   # no ring for the complete graph
    assert graph.for_group(_config(5, 4)[0]) == g                             # k >= m - 1 is complete too
    with pytest.raises(ValueError):                                           # (was graph.build(1, ...))
        GroupConfig(session=bytes(16), members=1, threshold=1, dim=1)


def test_contribution_commitment() -> None:
    c = os.urandom(32)
    assert graph.commit_contribution(c) == graph.commit_contribution(c) == graph.commit_contribution_or_none(c)
    assert len(graph.commit_contribution(c)) == 32
    assert graph.commit_contribution(c) != graph.commit_contribution(os.urandom(32))
    assert graph.commit_contribution(c) != c
    for bad in (b"", c[:31], c + b"x"):
        with pytest.raises(ValueError, match="32 random bytes"):
            graph.commit_contribution(bad)
        assert graph.commit_contribution_or_none(bad) is None


@pytest.mark.parametrize("m, k", [(10, 2), (10, 4), (20, 6), (21, 8), (7, 4), (40, 10)])
def test_harary_regular_symmetric_no_self_loops(m: int, k: int) -> None:
    order = _ring(m)
    g = graph.harary(order, k)
    assert sorted(g) == list(range(1, m + 1))
    for u, nb in g.items():
        assert len(nb) == k
        assert u not in nb
        assert nb <= set(range(1, m + 1))
        for v in nb:
            assert u in g[v]
        assert graph.neighbourhood(order, k, u) == nb          # what a client computes alone
    assert graph.harary(order, k) == g                         # deterministic per ring order
    # neighbours are the k/2 nearest on each side of the ring
    for p in (0, 3, m - 1):
        assert g[order[p]] == {order[(p + d) % m] for d in range(-(k // 2), k // 2 + 1) if d}
    # a group's graph is the Harary graph over the ring drawn from its opened contributions
    cfg, contributions = _config(m, k)
    assert cfg.sparse and cfg.degree == k
    assert graph.for_group(cfg, contributions) == graph.harary(graph.ring_order(cfg, contributions), k)
    # the ring is connected: a BFS reaches everyone
    seen, todo = {1}, [1]
    while todo:
        for v in g[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    assert len(seen) == m


def test_harary_different_contributions_differ() -> None:
    """(Was: different graph seeds give different graphs.)  The ring is drawn from the members'
    fresh contributions and the config digest: five groups with the same seats and settings but
    fresh contributions get five different graphs; one group always gets the same."""
    m, k = 30, 4
    graphs = set()
    for i in range(5):
        cfg, contributions = _config(m, k)
        g = graph.for_group(cfg, contributions)
        assert g == graph.for_group(cfg, dict(contributions))
        graphs.add(tuple(sorted((u, tuple(sorted(nb))) for u, nb in g.items())))
    assert len(graphs) == 5


@pytest.mark.parametrize("m, k", [(5, 4), (6, 5), (6, 6), (8, 7), (8, 100), (4, 3)])
def test_harary_large_k_gives_complete(m: int, k: int) -> None:
    order = _ring(m)
    assert graph.harary(order, k) == graph.complete(m)
    assert all(graph.neighbourhood(order, k, u) == frozenset(range(1, m + 1)) - {u} for u in order)


@pytest.mark.parametrize("m, k", [(10, 3), (10, 1), (20, 5), (10, 0)])
def test_harary_rejects_odd_or_tiny_k(m: int, k: int) -> None:
    with pytest.raises(ValueError, match="even"):
        graph.harary(_ring(m), k)
    with pytest.raises(ValueError, match="even"):                 # and no config can ask for it
        GroupConfig(session=bytes(16), members=m, threshold=1, dim=1, neighbors=k)


def test_ring_needs_every_commitment() -> None:
    cfg, contributions = _config(10, 4)
    with pytest.raises(ValueError, match="every member's commitment"):
        graph.ring_order(GroupConfig(session=cfg.session, members=10, threshold=1, dim=1, neighbors=4), contributions)
    order = graph.ring_order(cfg, contributions)
    assert sorted(order) == list(range(1, 11))


def test_recommended_degree_is_even_and_usable() -> None:
    for m in range(4, 200, 7):
        k = graph.recommended_degree(m)
        assert 2 <= k <= m - 1
        g = graph.harary(list(range(1, m + 1)), k)
        assert all(len(nb) >= min(k, m - 1) for nb in g.values())
        if k < m - 1:
            assert k % 2 == 0
    assert [graph.recommended_degree(m) for m in (2, 3)] == [1, 2]   # complete


# ============================================================================ thresholds


@pytest.mark.parametrize(
    "holders, semi, active",
    [(1, 1, 1), (2, 2, 2), (3, 2, 3), (4, 3, 3), (5, 3, 4), (6, 4, 5), (7, 4, 5), (10, 6, 7), (100, 51, 67)],
)
def test_threshold_minimum_values(holders: int, semi: int, active: int) -> None:
    assert thresholds.minimum(holders, Mode.SEMI_HONEST) == semi
    assert thresholds.minimum(holders, Mode.ACTIVE) == active
    assert thresholds.default(holders, Mode.SEMI_HONEST) == semi
    assert thresholds.default(holders, Mode.ACTIVE) == active


def test_threshold_minimum_is_the_smallest_safe_value() -> None:
    for n in range(1, 200):
        t = thresholds.minimum(n, Mode.SEMI_HONEST)
        assert 2 * t > n and 2 * (t - 1) <= n            # t > n/2, and t-1 is not
        t = thresholds.minimum(n, Mode.ACTIVE)
        assert 3 * t > 2 * n and 3 * (t - 1) <= 2 * n    # t > 2n/3, and t-1 is not
        for mode in Mode:
            assert 1 <= thresholds.default(n, mode) <= n
