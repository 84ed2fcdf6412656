// libssl for NBD over TLS: the headers, and the few OpenSSL macros Swift
// cannot import, as inline functions.
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <openssl/pem.h>

static inline long dr_ssl_ctx_set_min_proto_version(SSL_CTX *ctx, int version) {
  return SSL_CTX_set_min_proto_version(ctx, version);
}

static inline long dr_ssl_ctx_set_mode(SSL_CTX *ctx, long mode) { return SSL_CTX_set_mode(ctx, mode); }

static inline long dr_ssl_ctx_set_read_ahead(SSL_CTX *ctx, int yes) {
  SSL_CTX_set_read_ahead(ctx, yes);
  return 1;
}

static inline long dr_ssl_set_sni(SSL *ssl, const char *name) { return SSL_set_tlsext_host_name(ssl, name); }

static inline int dr_tls1_2_version(void) { return TLS1_2_VERSION; }

static inline long dr_ssl_mode_nbd(void) {
  return SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER;
}

static inline uint64_t dr_ssl_options_nbd(void) {
  return SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION;
}

// A socket BIO that sends with MSG_NOSIGNAL, so that a peer gone away is an
// error (EPIPE) and not a SIGPIPE that kills a tool which does not ignore it.
#include <errno.h>
#include <sys/socket.h>

static inline int dr_bio_send(BIO *bio, const char *data, int length) {
  int fd = -1;
  BIO_get_fd(bio, &fd);
  errno = 0;
  ssize_t n = send(fd, data, (size_t)length, MSG_NOSIGNAL);
  BIO_clear_retry_flags(bio);
  if (n <= 0 && BIO_sock_should_retry((int)n)) BIO_set_retry_write(bio);
  return (int)n;
}

/// The socket BIO method with `dr_bio_send` for writes; make it once.
static inline BIO_METHOD *dr_bio_method_new(void) {
  BIO_METHOD *method = BIO_meth_new(BIO_TYPE_SOCKET, "socket (MSG_NOSIGNAL)");
  if (method == NULL) return NULL;
  const BIO_METHOD *socket = BIO_s_socket();
  BIO_meth_set_write(method, dr_bio_send);
  BIO_meth_set_read(method, BIO_meth_get_read(socket));
  BIO_meth_set_puts(method, BIO_meth_get_puts(socket));
  BIO_meth_set_ctrl(method, BIO_meth_get_ctrl(socket));
  BIO_meth_set_create(method, BIO_meth_get_create(socket));
  BIO_meth_set_destroy(method, BIO_meth_get_destroy(socket));
  return method;
}

/// Attaches `fd` (not closed by OpenSSL) to `ssl` through `method`; 1 on success.
static inline int dr_ssl_attach(SSL *ssl, BIO_METHOD *method, int fd) {
  BIO *bio = BIO_new(method);
  if (bio == NULL) return 0;
  BIO_set_fd(bio, fd, BIO_NOCLOSE);
  SSL_set_bio(ssl, bio, bio);
  return 1;
}
