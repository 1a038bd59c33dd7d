// Composes subgraph SDLs into a supergraph with @apollo/composition, as a gateway's build
// step (rover supergraph compose) would. Usage: node compose.mjs NAME=FILE.graphql ...
// Prints {"supergraphSdl": ...} or {"errors": [...]} as JSON on stdout (tests/test_federation.py).
import { readFileSync } from "node:fs";
import { composeServices } from "@apollo/composition";
import { parse } from "graphql";

const services = process.argv.slice(2).map((argument) => {
  const split = argument.indexOf("=");  // the file's path may hold `=` too
  const [name, file] = [argument.slice(0, split), argument.slice(split + 1)];
  return { name, url: `http://${name}.invalid/graphql`, typeDefs: parse(readFileSync(file, "utf8")) };
});
const result = composeServices(services);
if (result.errors) {
  console.log(JSON.stringify({ errors: result.errors.map((error) => error.message) }));
} else {
  console.log(JSON.stringify({ supergraphSdl: result.supergraphSdl }));
}
