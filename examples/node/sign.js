// Sign through hsmgw from Node.js, then verify the signature with Node's own
// `crypto` module against the key's public key (GetPublicKey's PEM).
//
//   npm ci
//   node sign.js                       # the local gateway of `make run` (plaintext on loopback)
//   HSMGW_TARGET=gw.us-east-1.example:443 HSMGW_CA=ca.pem \
//     HSMGW_CERT=client.pem HSMGW_KEY=client-key.pem node sign.js   # mTLS
//
// Environment:
//   HSMGW_TARGET   gateway address (default 127.0.0.1:50051)
//   HSMGW_KEY_ID   key to sign with; created (EC P-256) if it does not exist (default demo/node-signing)
//   HSMGW_MESSAGE  what to sign (default "hello from node")
//   HSMGW_CA, HSMGW_CERT, HSMGW_KEY   PEM files: with HSMGW_CA the channel uses TLS, with all three mTLS
//
// Prints one JSON line: {"key_id", "algorithm", "cluster", "signature", "verified_locally",
// "tampered_rejected", "verified_by_gateway"}
// and exits 0 only if Node's crypto accepts the signature.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const ROOT = path.resolve(__dirname, '..', '..');
const PROTO = path.join(ROOT, 'protos', 'hsmgw', 'v1', 'crypto.proto');
// The retry policy every language can use (gRPC's built-in retries on UNAVAILABLE and CANCELLED).
const SERVICE_CONFIG = path.join(ROOT, 'deploy', 'grpc-service-config.json');

function loadService() {
  const definition = protoLoader.loadSync(PROTO, {
    includeDirs: [path.join(ROOT, 'protos')],
    keepCase: true, // field names as in the .proto: key_id, not keyId
    enums: String, // 'KEY_ALGORITHM_EC_P256' in and out
    longs: String,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).hsmgw.v1.CryptoService;
}

function credentials(env) {
  if (!env.HSMGW_CA) {
    return grpc.credentials.createInsecure();
  }
  const read = (name) => (env[name] ? fs.readFileSync(env[name]) : null);
  return grpc.credentials.createSsl(read('HSMGW_CA'), read('HSMGW_KEY'), read('HSMGW_CERT'));
}

// Promisified unary call with a deadline (a call without one could wait forever).
function call(client, method, request, seconds = 30) {
  const deadline = new Date(Date.now() + seconds * 1000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function ensureKey(client, keyId) {
  try {
    return await call(client, 'GetKey', { key_id: keyId });
  } catch (err) {
    if (err.code !== grpc.status.NOT_FOUND) throw err;
  }
  // GenerateKey is idempotent by request_id: a retry (or a second run racing this
  // one) gets the same key instead of an error.
  return call(client, 'GenerateKey', {
    request_id: `node-example:${keyId}`,
    key_id: keyId,
    algorithm: 'KEY_ALGORITHM_EC_P256',
    usage: 'KEY_USAGE_SIGN_VERIFY',
  }, 120);
}

async function main(env) {
  const target = env.HSMGW_TARGET || '127.0.0.1:50051';
  const keyId = env.HSMGW_KEY_ID || 'demo/node-signing';
  const message = Buffer.from(env.HSMGW_MESSAGE || 'hello from node', 'utf8');

  const CryptoService = loadService();
  const client = new CryptoService(target, credentials(env), {
    'grpc.service_config': fs.readFileSync(SERVICE_CONFIG, 'utf8'),
  });
  try {
    const key = await ensureKey(client, keyId);
    const signed = await call(client, 'Sign', {
      key_id: keyId,
      algorithm: 'ALGORITHM_ECDSA_SHA256',
      message, // the gateway hashes it; send `digest` instead to hash here
    });
    const publicKey = await call(client, 'GetPublicKey', { key_id: keyId });

    // ECDSA signatures from hsmgw are DER, which is Node's default encoding.
    const verifiedLocally = crypto.verify('sha256', message, publicKey.pem, signed.signature);
    const tampered = crypto.verify('sha256', Buffer.concat([message, Buffer.from('!')]), publicKey.pem,
      signed.signature);
    const byGateway = await call(client, 'Verify', {
      key_id: keyId,
      algorithm: 'ALGORITHM_ECDSA_SHA256',
      message,
      signature: signed.signature,
    });

    console.log(JSON.stringify({
      key_id: keyId,
      algorithm: key.algorithm,
      cluster: signed.cluster,
      signature: signed.signature.toString('hex'),
      verified_locally: verifiedLocally,
      tampered_rejected: !tampered,
      verified_by_gateway: byGateway.valid,
    }));
    if (!verifiedLocally || tampered || !byGateway.valid) {
      throw new Error('signature verification failed');
    }
  } finally {
    client.close();
  }
}

main(process.env).catch((err) => {
  // One clear line: gRPC errors carry a status code name and the server's message.
  const code = err.code !== undefined ? ` (${grpc.status[err.code] || err.code})` : '';
  console.error(`error${code}: ${err.details || err.message}`);
  process.exit(1);
});
