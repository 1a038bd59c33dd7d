// A page of consumers with their audiences, as a Relay app's list screen asks for it.
import { graphql } from "relay-runtime";

export const query = graphql`
  query ConsumerListQuery($first: Int!) {
    consumers(first: $first) {
      totalCount
      edges {
        node {
          id
          ...ConsumerList_consumer
        }
      }
    }
  }
`;

export const consumerFragment = graphql`
  fragment ConsumerList_consumer on Consumer {
    email
    fullName
    audiences(first: 5) {
      nodes {
        name
      }
    }
  }
`;
