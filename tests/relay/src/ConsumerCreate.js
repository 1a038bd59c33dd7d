// The form that adds a consumer.
import { graphql } from "relay-runtime";

export const mutation = graphql`
  mutation ConsumerCreateMutation($input: ConsumerCreateInput!) {
    consumerCreate(input: $input) {
      consumer {
        id
        email
      }
      userErrors {
        code
        field
        message
      }
    }
  }
`;
