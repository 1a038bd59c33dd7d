// Runs graphql-http's GraphQL over HTTP audit suite (auditServer) against a running server,
// prints every result, and exits 1 when any MUST fails (SHOULD and MAY failures are listed).
// Usage: CONSUMERS_API_KEY=sk_… node graphql-http-audit.mjs http://127.0.0.1:8000/graphql
import { auditServer } from 'graphql-http';

const url = process.argv[2] ?? process.env.GRAPHQL_URL;
if (!url) {
  console.error('usage: node graphql-http-audit.mjs <url of /graphql>');
  process.exit(2);
}
const key = process.env.CONSUMERS_API_KEY;

// Every request of the suite carries the API key; the suite itself knows nothing of auth.
function fetchWithKey(input, init = {}) {
  const headers = new Headers(init.headers);
  if (key && !headers.has('authorization')) headers.set('authorization', `Bearer ${key}`);
  return fetch(input, { ...init, headers });
}

const results = await auditServer({ url, fetchFn: fetchWithKey });
const level = (name) => name.split(' ')[0];
const counts = {};
let mustFailures = 0;
for (const result of results.sort((a, b) => a.name.localeCompare(b.name))) {
  const requirement = level(result.name);
  counts[requirement] ??= { passed: 0, failed: 0 };
  if (result.status === 'ok') {
    counts[requirement].passed += 1;
    console.log(`PASS  ${result.id}  ${result.name}`);
    continue;
  }
  counts[requirement].failed += 1;
  if (result.status === 'error') mustFailures += 1;
  const label = { error: 'FAIL', warn: 'WARN', notice: 'NOTE' }[result.status];
  let body = '';
  try {
    body = (await result.response.text()).slice(0, 300);
  } catch {
    // the body was already read by the audit
  }
  console.log(`${label}  ${result.id}  ${result.name}\n      ${result.reason}` +
              `${body ? `\n      response (${result.response.status}): ${body}` : ''}`);
}
console.log('\n' + Object.entries(counts)
  .map(([requirement, c]) => `${requirement}: ${c.passed}/${c.passed + c.failed} passed`)
  .join(', '));
process.exit(mustFailures > 0 ? 1 : 0);
