#include <openssl/evp.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/crypto.h>

// Key derivation for encrypted block streams: OSSL_PARAM arrays keep
// pointers to their keys and values, which Swift cannot hold still, so the
// two derivations are built here.
#include <openssl/core_names.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

/// scrypt (RFC 7914) through EVP_KDF "SCRYPT"; 1 on success.
static inline int dr_scrypt(const unsigned char *pass, size_t pass_len, const unsigned char *salt, size_t salt_len,
                            uint64_t n, uint32_t r, uint32_t p, uint64_t max_memory, unsigned char *out,
                            size_t out_len) {
  EVP_KDF *kdf = EVP_KDF_fetch(NULL, "SCRYPT", NULL);
  if (kdf == NULL) return 0;
  EVP_KDF_CTX *ctx = EVP_KDF_CTX_new(kdf);
  EVP_KDF_free(kdf);
  if (ctx == NULL) return 0;
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_PASSWORD, (void *)pass, pass_len),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, salt_len),
      OSSL_PARAM_construct_uint64(OSSL_KDF_PARAM_SCRYPT_N, &n),
      OSSL_PARAM_construct_uint32(OSSL_KDF_PARAM_SCRYPT_R, &r),
      OSSL_PARAM_construct_uint32(OSSL_KDF_PARAM_SCRYPT_P, &p),
      OSSL_PARAM_construct_uint64(OSSL_KDF_PARAM_SCRYPT_MAXMEM, &max_memory),
      OSSL_PARAM_construct_end()};
  int ok = EVP_KDF_derive(ctx, out, out_len, params) == 1;
  EVP_KDF_CTX_free(ctx);
  return ok;
}

/// HKDF-SHA256 (RFC 5869), extract then expand, through `kdf`, the EVP_KDF
/// "HKDF" the caller fetched once (a fetch is a search of OpenSSL's
/// providers, dearer than the derivation); 1 on success.
static inline int dr_hkdf_sha256(EVP_KDF *kdf, const unsigned char *key, size_t key_len, const unsigned char *salt,
                                 size_t salt_len, const unsigned char *info, size_t info_len, unsigned char *out,
                                 size_t out_len) {
  if (kdf == NULL) return 0;
  EVP_KDF_CTX *ctx = EVP_KDF_CTX_new(kdf);
  if (ctx == NULL) return 0;
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)"SHA256", 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)key, key_len),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, salt_len),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info, info_len),
      OSSL_PARAM_construct_end()};
  int ok = EVP_KDF_derive(ctx, out, out_len, params) == 1;
  EVP_KDF_CTX_free(ctx);
  return ok;
}

/// HMAC-SHA256 of `message` under `key` into `out` (32 bytes), through
/// `mac`, the EVP_MAC "HMAC" the caller fetched once; 1 on success.
static inline int dr_hmac_sha256(EVP_MAC *mac, const unsigned char *key, size_t key_len,
                                 const unsigned char *message, size_t message_len, unsigned char *out) {
  if (mac == NULL) return 0;
  EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac);
  if (ctx == NULL) return 0;
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
                         OSSL_PARAM_construct_end()};
  size_t length = 0;
  int ok = EVP_MAC_init(ctx, key, key_len, params) == 1 && EVP_MAC_update(ctx, message, message_len) == 1 &&
           EVP_MAC_final(ctx, out, &length, 32) == 1 && length == 32;
  EVP_MAC_CTX_free(ctx);
  return ok;
}
