// A supergraph served by Apollo Gateway (tests/test_federation.py): the consumers subgraph
// (a running `consumers-graphql serve`) and a tiny loyalty subgraph served here, both composed
// into SUPERGRAPH (compose.mjs) beforehand. The loyalty subgraph is tests/federation/
// loyalty.graphql: LEADERS (comma-separated consumer ids) with 100, 90, 80… points.
// Environment: SUPERGRAPH, CONSUMERS_URL, CONSUMERS_KEY, LEADERS. Prints one line of JSON,
// {"gateway": URL, "loyalty": URL}, once both listen (on free loopback ports).
import { readFileSync } from "node:fs";
import { ApolloServer } from "@apollo/server";
import { ApolloServerPluginInlineTraceDisabled } from "@apollo/server/plugin/disabled";
import { startStandaloneServer } from "@apollo/server/standalone";
import { ApolloGateway, RemoteGraphQLDataSource } from "@apollo/gateway";
import { buildSubgraphSchema } from "@apollo/subgraph";
import { parse } from "graphql";

const leaders = process.env.LEADERS.split(",");
const points = new Map(leaders.map((id, rank) => [id, 100 - 10 * rank]));
const loyalty = new ApolloServer({
  schema: buildSubgraphSchema({
    typeDefs: parse(readFileSync(new URL("loyalty.graphql", import.meta.url), "utf8")),
    resolvers: {
      Query: {
        loyaltyLeaders: (_, { first }) => leaders.slice(0, first).map((id) => ({ id })),
      },
      Consumer: {
        __resolveReference: ({ id }) => ({ id }),
        loyaltyPoints: ({ id }) => points.get(id) ?? 0,
      },
    },
  }),
  plugins: [ApolloServerPluginInlineTraceDisabled()],
});
const { url: loyaltyUrl } = await startStandaloneServer(loyalty, {
  listen: { host: "127.0.0.1", port: 0 },
});

const urls = { consumers: process.env.CONSUMERS_URL, loyalty: loyaltyUrl };
const gateway = new ApolloGateway({
  supergraphSdl: readFileSync(process.env.SUPERGRAPH, "utf8"),
  buildService: ({ name }) =>
    new RemoteGraphQLDataSource({
      url: urls[name],
      willSendRequest({ request }) {
        // the consumers subgraph wants an API key; the gateway holds it, never the browser
        if (name === "consumers") {
          request.http.headers.set("authorization", `Bearer ${process.env.CONSUMERS_KEY}`);
        }
      },
    }),
});
const server = new ApolloServer({ gateway });
const { url } = await startStandaloneServer(server, { listen: { host: "127.0.0.1", port: 0 } });
console.log(JSON.stringify({ gateway: url, loyalty: loyaltyUrl }));
